import { forgetVm, warnCatalogue } from '../catalogue.js';
import { deregister as deregisterVm, type RegistrationResult, type XapiVmOptions } from './xscontainer.js';

export { XapiError } from './rpc.js';
export { checkXapiSettings, parseXapiUrl, withXapiSession, type XapiConnectOptions, type XapiSession } from './session.js';
export {
  CONTAINER_ACTIONS,
  containerAction,
  fromImage,
  listContainers,
  parseDockerPs,
  register,
  waitMonitoring,
  type ContainerAction,
  type ContainerActionOptions,
  type ContainerActionResult,
  type MonitoredContainer,
  type RegistrationResult,
  type WaitMonitoringOptions,
  type WaitMonitoringResult,
  type XapiVmOptions,
} from './xscontainer.js';

/** Deregister a Docker VM; the catalogue then lists it under no image. */
export async function deregister(options: XapiVmOptions): Promise<RegistrationResult> {
  const r = await deregisterVm(options);
  await forgetVm(r.vm).catch(warnCatalogue);
  return r;
}
